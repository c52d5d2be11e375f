"""The control plane: what runs in the operator process.

`controller` (kopf handlers) → `parts` (one part's life) → `rayjobs` (Ray Jobs API or KubeRay), with
`kube` (the API calls besides kopf's), `status` (the CRD and status fields), `metrics` and `config`.
It reads a part's output only through `contract` and `storage`, and never imports the pipeline, Ray
or pyarrow: the operator image does not have them.
"""
