"""Layer 3: the publisher's drain loop, the Kafka producer and the metrics registry."""
