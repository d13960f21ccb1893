"""fedclip-edge: federated personalization of CLIP on edge devices (FedCLIP)."""

import os as _os

__version__ = "0.1.0"

# The prompt template of the FedCLIP reference: "a picture of a " + class folder name.
PROMPT_TEMPLATE = "a picture of a {}"

# torch's CPU threads run on OpenMP, which reads its wait policy once, when torch loads; this
# package is imported first by the CLI (and its child processes inherit the setting). By default
# a thread that waits at a barrier spins before it sleeps: on a machine whose cores are busy with
# other work the spinning thread burns the time slice its partner needs, and the offline model's
# pretraining ran 8-20x slower than with PASSIVE beside the same load (docs/results.md, "Building
# it on a busy machine"; on an idle machine PASSIVE costs about a third). PASSIVE sleeps at once;
# an OMP_WAIT_POLICY (or GOMP_SPINCOUNT) set by the user is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
