# megatron_sail on an NGC PyTorch image: the image brings CUDA, PyTorch, Transformer Engine,
# NVIDIA Apex and DALI; we add the pinned pure-Python requirements and the project itself.
#
#   docker build --build-arg BASE_IMAGE=<NGC PyTorch image, tag 25.10-py3 or newer> -t megatron_sail .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -e DATA_PATH=/data/pretrain -e VALID_DATA_PATH=/data/valid \
#       megatron_sail bash examples/pretrain_sail_8b.sh
# The full reference of NVIDIA's NGC PyTorch container (the "pytorch" repository of the NGC
# catalog, tag 25.10-py3 or newer); required, the build stops when it is not given.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1
WORKDIR /workspace/megatron_sail

# The image's own torch, numpy and DALI builds stay (TE and Apex are compiled against them):
# drop those pins, install the rest. Transformer Engine needs a GPU to import, which a build
# does not have, so only the pure-Python parts are checked here.
COPY requirements.txt .
RUN grep -v -E '^(torch|numpy|nvidia-dali-cuda[0-9]+)==' requirements.txt > /tmp/requirements.image.txt \
 && pip install --no-cache-dir -r /tmp/requirements.image.txt \
 && python -c "import nvidia.dali, megatron.core; print('DALI, megatron-core: ok')"

COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python -c "import megatron_sail"

CMD ["bash"]
