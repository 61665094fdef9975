"""Modality encoders, connectors and processors (imported as `zoo.encoders`)."""
