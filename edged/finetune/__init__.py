"""On-device fine-tuning (docs/finetune.md): labels in, a better head out, or nothing."""
