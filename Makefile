# make demo: set up, then interpolate the bundled sample and write the output plus a comparison PNG.
# make test: set up, then run the whole test suite (CPU only, about 10 minutes on 2 cores).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Used only on machines without an NVIDIA GPU and without a local CPU wheel.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
DEMO_OUT ?= demo-output

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: Backend/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Never pull the multi-GB CUDA torch on a CPU machine: the +cpu local version matches only a CPU build
	@# (a local wheel pip can find, its dependencies from the usual index), else the PyTorch CPU index.
	@if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	elif $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null; then \
		echo "torch $(TORCH_VERSION): local CPU build"; \
	else \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -q -e "Backend[server,training,test]"
	touch $@

demo: setup
	mkdir -p $(DEMO_OUT)
	$(BIN)/ctsliceinterp interpolate samples/phantom_head_thick_5mm.nii.gz -o $(DEMO_OUT)/phantom_head_thin_1mm.nrrd \
		--figure $(DEMO_OUT)/phantom_head_comparison.png
	@echo "Output: $(DEMO_OUT)/phantom_head_thin_1mm.nrrd and $(DEMO_OUT)/phantom_head_comparison.png"

test: setup
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest Testing -q -p no:cacheprovider

bench: setup
	$(BIN)/python benchmarks/bench_classical.py

clean:
	rm -rf $(VENV) $(DEMO_OUT)
