"""Where training runs: local multi-node Ray clusters, the MLflow server, cloud and KubeRay configs."""

from pathlib import Path

# The project's source tree (site-packages in an installed wheel): what a submitted job carries,
# what `aiayn bundle` builds, where the benchmarks and the git commit are found.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
