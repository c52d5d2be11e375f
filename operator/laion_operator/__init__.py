"""laion-operator: LAION metadata parts to training-ready image datasets, on Ray.

Two wings meet at one contract:
- `pipeline/` runs inside Ray: filter → download or convert (samples recorded into an output format
  of `pipeline/formats/`) → annotate → verify → latents, driven by `driver`;
- `control/` runs in the operator: kopf handlers → one part's reconciler → Ray backends, status, metrics;
- `contract` names everything in a part's output folder, the only thing both wings read;
- `spec` is the one part model both share, `storage` and `credentials` reach the output;
- `testbed/` is the demo's loopback internet (image server, metadata generator, the demo command).
"""

__version__ = "0.1.0"
