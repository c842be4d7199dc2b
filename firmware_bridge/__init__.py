"""Microcontroller sensors over serial into edged, and signed firmware relayed to them.

Empty until its issue lands; the daemon's source interface (issue 4) is where it plugs in."""
