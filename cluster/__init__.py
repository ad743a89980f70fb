"""Where training runs: local multi-node Ray clusters, the MLflow server, cloud and KubeRay configs."""
