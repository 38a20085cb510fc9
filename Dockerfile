# An image that runs this template at one commit.
#
#   make docker-build        # refuses a dirty tree, passes the commit in, tags the image
#   docker run --rm -v "$PWD/data:/project/data" -v "$PWD/logs:/project/logs" \
#       pytorch-template:<commit> sample_runconfig.yaml
#
# The image holds no .git (see .dockerignore). The commit it was built from comes in as
# the build argument GIT_COMMIT and is set as PROVENANCE_GIT_COMMIT, which the git gate
# records in every run's config.yaml (source: "environment variable ..."). Without it,
# a logged run is refused, as it would be from any directory that is not a repository.
# Mounting a checkout with its .git over /project works too: the gate then reads git itself.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /project

# The same pinned requirements as every other install. From PyPI, torch is the CUDA build;
# for a smaller CPU-only image: --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_INDEX_URL=
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY . .

ARG GIT_COMMIT=
ENV PROVENANCE_GIT_COMMIT=${GIT_COMMIT}

ENTRYPOINT ["python", "run.py"]
CMD ["--help"]
