"""The local stack: PostgreSQL, Kafka and etcd + kube-apiserver on loopback, no Docker."""
