"""The HTML scan report: built from real detector output (the planted induction model), plus a role that
does not apply; opened in headless Chromium (Debian package ``chromium``) to check that every figure
rendered, offline, and that the page logged no JavaScript error."""
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from headlens.catalogue import scan
from headlens.detectors import Detector, get_detector
from headlens.errors import HeadlensError
from headlens.report import render_report, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Collects errors from the first moment (inserted first in <head>) ...
_COLLECT = """<script>window.__hlErrors=[];
window.addEventListener('error',function(e){window.__hlErrors.push('error: '+(e.message||e.type));},true);
window.addEventListener('unhandledrejection',function(e){window.__hlErrors.push('rejection: '+e.reason);});
(function(){var ce=console.error;console.error=function(){window.__hlErrors.push('console.error: '+
Array.prototype.join.call(arguments,' '));ce.apply(console,arguments);};})();</script>"""
# ... and writes the verdict into the DOM once the page has loaded and plotly has drawn.
_VERDICT = """<script>window.addEventListener('load',function(){setTimeout(function(){
var figs=document.querySelectorAll('.headlens-figure');var drawn=0;
figs.forEach(function(f){if(f.querySelector('.js-plotly-plot .main-svg'))drawn++;});
var d=document.createElement('pre');d.id='hl-verdict';
d.textContent=JSON.stringify({figures:figs.length,drawn:drawn,errors:window.__hlErrors});
document.body.appendChild(d);},500);});</script>"""


def render_in_chromium(html_path, tmp_path):
    """Open ``html_path`` in headless Chromium (network blocked); return (verdict dict, stderr)."""
    if CHROMIUM is None:
        pytest.fail("headless Chromium is needed for the report test: apt-get install -y chromium")
    text = html_path.read_text(encoding="utf-8")
    probe = tmp_path / f"probe-{html_path.name}"
    probe.write_text(text.replace("<head>", "<head>" + _COLLECT, 1).replace("</body>", _VERDICT + "</body>", 1),
                     encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000", "--dump-dom",
           probe.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="hl-verdict">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"Chromium produced no verdict (rc {proc.returncode}): {proc.stderr[-2000:]}"
    verdict = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                         .replace("&amp;", "&"))
    return verdict, proc.stderr


def js_errors(verdict, stderr):
    logged = [l for l in stderr.splitlines() if "Uncaught" in l or ("CONSOLE" in l and "ERROR" in l)]
    return verdict["errors"] + logged


class NeverRefusesDetector(Detector):
    """A hand-made role that does not apply (as a safety detector says of a model that never refuses)."""
    name = "never_refuses"
    summary = "test role that never applies"

    @dataclass
    class Params:
        pass

    def run(self, model, seed=0):
        return self.not_applicable(model, "the model never refuses, so it has no heads of this role",
                                   refusal_rate=0.0)


@pytest.fixture(scope="module")
def planted_catalogue(planted_induction):
    induction = get_detector("induction", seq_len=8, n_repeats=3, n_seqs=4, copy_positions=3,
                             causal_seqs=4, top_k=1, n_random=99)
    return scan(planted_induction, [induction, NeverRefusesDetector()], seed=0)


def test_report_renders_in_chromium_without_errors(planted_catalogue, planted_induction, tmp_path):
    cat = planted_catalogue
    assert cat.meta["detectors"]["induction"]["labelled"] == ["L1H2"]      # real detector output
    path = write_report(cat, tmp_path / "report.html", model=planted_induction,
                        prompts={"induction": "t3 t7 t5 t9 t11 t3 t7 t5 t9 t11"})
    text = path.read_text(encoding="utf-8")
    # Offline: plotly inlined exactly once, no external script.
    assert not re.search(r"<script[^>]+src=", text)
    assert text.count("* plotly.js v") == 1 and text.count('<div class="headlens-figure">') == 3
    # induction: heatmap + causal check + attention of the top head; never_refuses: none (not applicable).
    _, n_figs = render_report(cat, planted_induction)
    # The attention figure shows the planted induction pattern: from the second t7 to the first t5.
    assert "10:&#x27;t11&#x27;" in text or "10:'t11'" in text
    assert n_figs == 3
    assert "not_applicable" in text and "the model never refuses" in text
    assert "L1H2" in text and "induction_copying" in text
    assert "clean_repeat_loss" in text and "refusal_rate" in text        # run details of both roles
    assert "timings_s" not in text and "detector seconds" in text
    verdict, stderr = render_in_chromium(path, tmp_path)
    assert verdict["figures"] == 3 and verdict["drawn"] == 3, verdict
    assert js_errors(verdict, stderr) == []
    assert not list(tmp_path.glob(".report.html.*.tmp"))                   # atomic write left nothing


def test_chromium_check_catches_a_broken_page(planted_catalogue, tmp_path):
    """The browser check can fail: a page with a JavaScript error and a figure that never draws."""
    path = write_report(planted_catalogue, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("</body>", '<div class="headlens-figure"></div>'
                                              "<script>undefinedFunction();</script></body>"), encoding="utf-8")
    verdict, stderr = render_in_chromium(broken, tmp_path)
    assert verdict["figures"] == 3 and verdict["drawn"] == 2
    assert any("undefinedFunction" in e for e in js_errors(verdict, stderr))


def test_report_without_model_and_bad_path(planted_catalogue, tmp_path):
    path = write_report(planted_catalogue, tmp_path / "r.html")
    text = path.read_text(encoding="utf-8")
    assert text.count('<div class="headlens-figure">') == 2                # no attention figure
    assert text.count("* plotly.js v") == 1
    with pytest.raises(HeadlensError, match="does not exist"):
        write_report(planted_catalogue, tmp_path / "missing" / "r.html")
    with pytest.raises(HeadlensError, match="directory"):
        write_report(planted_catalogue, tmp_path)


def test_report_from_csv_round_trip(planted_catalogue, tmp_path):
    """A catalogue read back from CSV + sidecar gives the same report sections."""
    from headlens.catalogue import read_catalogue

    planted_catalogue.to_csv(tmp_path / "cat.csv")
    back = read_catalogue(tmp_path / "cat.csv")
    text, n = render_report(back)
    assert n == 2 and 'id="role-induction"' in text and 'id="role-never_refuses"' in text
    assert os.path.getsize(tmp_path / "cat.csv") > 0
