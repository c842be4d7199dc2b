"""Over-the-air model updates on the device: the update client and its fetcher, the A/B model
slots, and binary deltas against the installed parent (`edged.ota.delta`). The trust walk
itself is pure and shared: `edged_formats.tuf`."""
