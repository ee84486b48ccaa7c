"""The transport: a Broker over streams and consumer groups, and the frame blob store."""
