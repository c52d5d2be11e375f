"""The operator's CustomResourceDefinitions, built from the spec schemas (spec.py) and the status
schemas (status.py, datasets.py): `laion-operator crd` prints them, `scripts/sync-crd` writes crds/.
"""

from __future__ import annotations

from .. import spec as specs
from . import datasets, kube, status


def custom_resource_definition(
    kind: str,
    plural: str,
    short_name: str,
    description: str,
    spec_schema: dict,
    status_schema: dict,
    printer_columns: list[dict],
) -> dict:
    """A namespaced CRD of this operator's group with a status subresource (LaionPart, LaionDataset)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{kube.GROUP}"},
        "spec": {
            "group": kube.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["laion"],
            },
            "versions": [
                {
                    "name": kube.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def part_crd() -> dict:
    """The LaionPart CustomResourceDefinition (crds/laionpart.yaml holds its copy)."""
    return custom_resource_definition(
        "LaionPart",
        kube.PLURAL,
        "lp",
        "One LAION metadata part turned into an image dataset in object storage.",
        specs.SCHEMA,
        status.STATUS_SCHEMA,
        status.PRINTER_COLUMNS,
    )


def dataset_crd() -> dict:
    """The LaionDataset CustomResourceDefinition (crds/laiondataset.yaml)."""
    return custom_resource_definition(
        datasets.KIND,
        kube.DATASET_PLURAL,
        "lds",
        "A LAION dataset of many parts (LaionParts made from one template).",
        specs.DATASET_SCHEMA,
        datasets.STATUS_SCHEMA,
        datasets.PRINTER_COLUMNS,
    )
