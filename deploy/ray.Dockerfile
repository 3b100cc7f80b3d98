# The image of a plugmoe cluster on Ray (KubeRay's RayService in deploy/kuberay-rayservice.yaml, or `ray start`
# by hand): Ray's own image, with the Ray version plugmoe[cluster] pins, plus torch and plugmoe.
#   docker build -f deploy/ray.Dockerfile -t plugmoe-ray:2.60.0 .                       # GPU (CUDA torch wheel)
#   docker build -f deploy/ray.Dockerfile -t plugmoe-ray:2.60.0-cpu \
#     --build-arg BASE=rayproject/ray:2.60.0-py311 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple

COPY --chown=ray:users . /home/ray/plugmoe
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir "/home/ray/plugmoe[cluster]"
