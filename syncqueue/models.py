"""The durable sync queue: twins, sync events and conflicts."""
