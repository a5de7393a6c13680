"""Quantized checkpoints: where their settings are found (``detect``), AutoAWQ's int4
layout (``awq_format``) and the linear method that runs it (``awq``)."""
