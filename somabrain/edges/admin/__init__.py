"""The admin HTTP API (`api`) and who may call it (`auth`)."""
