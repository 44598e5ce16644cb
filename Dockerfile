# megatron_sail on an NGC PyTorch image: the image brings CUDA, PyTorch, Transformer Engine,
# NVIDIA Apex and DALI; we add the pinned pure-Python requirements and the project itself.
#
#   docker build -t megatron_sail .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -e DATA_PATH=/data/pretrain -e VALID_DATA_PATH=/data/valid \
#       megatron_sail bash examples/pretrain_sail_8b.sh
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1
WORKDIR /workspace/megatron_sail

# The image's own torch and numpy builds stay (TE, Apex and DALI are compiled against them):
# drop those pins, install the rest.
COPY requirements.txt .
RUN grep -v -E '^(torch|numpy)==' requirements.txt > /tmp/requirements.image.txt \
 && pip install --no-cache-dir -r /tmp/requirements.image.txt \
 && python -c "import transformer_engine, nvidia.dali, megatron.core; print('TE, DALI, megatron-core: ok')"

COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python -c "import megatron_sail"

CMD ["bash"]
