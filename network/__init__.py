"""The wire: message schemas, topics, MQTT messaging, the file store and its client, the broker."""
