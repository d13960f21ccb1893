"""Serving what the federation learned, on the device (issue 17): the model store (store.py),
the fused classifier export and its runtime, the `classify` and `serve` commands.

Knows nothing of MQTT: it must not import broker, device_agent, paho or amqtt (the agent imports
serving.store, never the other way). Submodules are imported by name; this file stays empty so
that importing one part does not load torch-heavy others.
"""
