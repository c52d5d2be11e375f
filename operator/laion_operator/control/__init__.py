"""The control plane: what runs in the operator process.

`controller` (kopf handlers) → `parts` (one part's life, a package of its ideas) and `datasets` →
`context` (what they share) → `rayjobs` (Ray Jobs API or KubeRay), with `lifecycle` (the decisions),
`kube` (the API calls besides kopf's), `status` (the CRD and status fields), `metrics` and `config`;
import-linter holds that order (operator/pyproject.toml).
It reads a part's output only through `contract` and `storage`, and never imports the pipeline, Ray
or pyarrow: the operator image does not have them.
"""
