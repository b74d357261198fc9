"""The cluster examples in jobs/ stay valid: the KubeRay RayJob and the pipeline config it runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from raysrec.pipeline import PipelineConfig

DEPLOY = Path(__file__).resolve().parents[2] / "jobs"


def test_the_rayjob_has_a_cpu_head_gpu_workers_and_object_storage():
    job = yaml.safe_load((DEPLOY / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"].startswith("2.60")
    assert "--storage-path s3://" in spec["entrypoint"] and spec["entrypoint"].startswith("raysrec pipeline")
    head = spec["rayClusterSpec"]["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    assert head["rayStartParams"]["num-cpus"] == "0"                         # the head trains nothing
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]       # and has no GPU
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for container in (head_container, worker):                               # credentials from a Secret
        assert container["envFrom"] == [{"secretRef": {"name": "raysrec-s3"}}]
        assert "cu1" in container["image"]                                   # an image with CUDA torch


def test_the_cluster_pipeline_config_is_valid_and_uses_the_gpu_workers():
    job = yaml.safe_load((DEPLOY / "kuberay-rayjob.yaml").read_text())
    cfg = PipelineConfig.load(DEPLOY / "pipeline-cluster.yaml")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]
    assert cfg.train.use_gpu and cfg.train.num_workers == workers and cfg.train.gpus_per_worker == 1
    assert cfg.prepare.source.path.startswith("s3://") and not cfg.deploy


class _NoDuplicates(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"keys given twice: {twice}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def test_no_shipped_yaml_sets_a_key_twice():
    """serve/config.yaml (the packaged deploy template) set retrieval and ann_min_items twice."""
    root = DEPLOY.parent
    files = [p for d in ("jobs", "serve", "tune", "raysrec") for p in (root / d).rglob("*.yaml")]
    assert root / "raysrec" / "serving" / "deploy.yaml" in files
    for path in files:
        yaml.load(path.read_text(), Loader=_NoDuplicates)     # raises on a duplicate
