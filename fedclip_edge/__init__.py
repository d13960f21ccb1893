"""fedclip-edge: federated personalization of CLIP on edge devices (FedCLIP)."""

__version__ = "0.1.0"

# The prompt template of the FedCLIP reference: "a picture of a " + class folder name.
PROMPT_TEMPLATE = "a picture of a {}"
