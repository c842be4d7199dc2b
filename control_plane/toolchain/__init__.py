"""torch -> int8 LiteRT bundles with Google's toolchain (litert-torch, ai-edge-quantizer).

Needs the `train` extra; nothing on the device imports this package."""
