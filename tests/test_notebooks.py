"""Every notebook in notebooks/ is stored without outputs and runs top to bottom on the embedded model.

Notebooks mark their settings cell with the tag ``parameters``; the test adds a cell right after it with
small settings (``SMALL`` below), so each notebook runs in about a minute. A notebook whose detector is
not registered fails here: a role is never skipped silently. Set ``HEADLENS_NOTEBOOK_OUT=<folder>`` to keep
the executed notebooks (with outputs) there.
"""
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

# Small settings per notebook (code run after the notebook's ``parameters`` cell).
SMALL = {
    "01_quickstart": "PARAMS = dict(seq_len=10, n_repeats=2, n_seqs=2, causal_seqs=1, n_random=4)",
    "02_induction": "PARAMS = dict(seq_len=8, n_repeats=2, n_seqs=2, causal_seqs=1, top_k=3, n_random=4)\n"
                    "REPEAT_LEN = 8\nCOMPARE_SEEDS = False",
    "03_successor": "PARAMS = dict(max_prompts=24, causal_prompts=12, top_k=3, n_random=4)",
    "04_copy_suppression": "PARAMS = dict(n_tokens=50, seq_len=48, n_seqs=4, cspa_heads=1, cspa_seqs=2, "
                           "causal_seqs=2, top_k=3, n_random=4)",
    "05_retrieval": "PARAMS = dict(context_lengths=[150], depths=[0.5], n_needles=2, max_new_tokens=12, "
                    "causal_runs=2, top_k=5, n_random=2)",
    "06_safety": "PARAMS = dict(n_prompts=4, max_new_tokens=12, candidates=4, group_size=2, n_random=3)",
    "09_attention_sink": "PARAMS = dict(seq_len=48, n_seqs=4, confirm_seqs=2, n_random=4, n_boot=200)",
    "07_previous_token": "PARAMS = dict(seq_len=32, n_seqs=2, confirm_seqs=2, confirm_len=8, text_seqs=1, "
                         "text_draws=2, top_k=3, n_random=4)\n"
                         "DUP_PARAMS = dict(seq_len=24, n_seqs=2, n_dups=4, confirm_seqs=2, confirm_len=24, "
                         "confirm_pairs=2, top_k=3, n_random=4)",
    "12_dual_route": "PARAMS = dict(n_prompts=2, confirm_prompts=1, context_len=6, n_random=4, candidate_draws=4, "
                     "n_boot=100)",
    "13_steering": "N_TRAIN = 4\nN_TEST = 4\nTOP_LAYERS = 1\nK = 3\nN_RANDOM = 1",
    "11_function_vector": "PARAMS = dict(n_demos=3, discovery_prompts=2, confirm_queries=2, n_top=3, top_k=3, "
                          "n_random=4, n_boot=200)",
    "10_ioi": "PARAMS = dict(n_prompts=8, n_confirm=8, sinh_prompts=4, n_random=4, n_boot=200)",
}


def test_there_is_a_notebook_per_role():
    """Every registered role has a notebook named after it, or is scanned in one (duplicate tokens share
    the previous-token notebook)."""
    from headlens.detectors import REGISTRY

    names = {p.stem for p in NOTEBOOKS}
    sources = {p.stem: p.read_text() for p in NOTEBOOKS}
    for role in REGISTRY:
        assert any(n.endswith(role) for n in names) or any(
            f'\\"{role}\\"' in text or f"'{role}'" in text for text in sources.values()), role
    assert any("quickstart" in n for n in names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.real
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    small = SMALL.get(path.stem)
    if small:
        tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        assert tagged, f"{path.name} has small settings in the test but no cell tagged 'parameters'"
        nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(small))
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - t0
    if os.environ.get("HEADLENS_NOTEBOOK_OUT"):               # keep the executed copy to look at
        nbformat.write(nb, Path(os.environ["HEADLENS_NOTEBOOK_OUT"]) / path.name)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    figures = sum("application/vnd.plotly.v1+json" in o.get("data", {})
                  for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures >= 1, f"{path.name} showed no figure"
    print(f"{path.name}: {seconds:.0f} s, {figures} figures")
