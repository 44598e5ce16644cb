# megatron_sail on an NGC PyTorch image: the image brings CUDA, PyTorch, Transformer Engine,
# NVIDIA Apex and DALI; we add the Python packages it lacks (at our pins) and the project itself.
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

# NGC PyTorch images (25.03+) pin every preinstalled package with a pip constraint file
# (PIP_CONSTRAINT): our pins of packages the image already has would contradict it. So the image's
# packages stay at its versions (torch, numpy and DALI always: TE and Apex are built against them)
# and only the missing ones are installed at our pins, with the image's constraints in force;
# megatron-core and transformers must be exactly our versions (tools/image_requirements.py says
# which package got what). Transformer Engine needs a GPU to import, which a build does not have:
# its version is checked, from its metadata, against the range megatron-core declares
# (build with --build-arg ALLOW_TE_MISMATCH=1 to go on outside it).
ARG ALLOW_TE_MISMATCH=0
COPY requirements.txt .
COPY tools/image_requirements.py tools/
RUN python tools/image_requirements.py requirements.txt > /tmp/requirements.image.txt \
 && pip install --no-cache-dir -r /tmp/requirements.image.txt \
 && (python tools/image_requirements.py --check-te || [ "${ALLOW_TE_MISMATCH}" = 1 ]) \
 && python -c "import nvidia.dali, megatron.core; print('DALI, megatron-core: ok')"

COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python -c "import megatron_sail"

CMD ["bash"]
