"""Wire format: msgpack messages with parameters as raw buffers, validated on decode."""
