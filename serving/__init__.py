"""Serving what the federation learned on the device: the model store, the classifier and the
HTTP service (issue 17). Knows nothing of MQTT: the agent writes the store, this reads it."""
