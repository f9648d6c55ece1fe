"""The audit's figures (PNG) and its self-contained ``index.html`` (figures embedded as base64, no external scripts,
styles or fonts)."""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

from peel_jax import runs
from peel_jax.audit._summary import EXACT_PSNR, THRESHOLDS, verdict

PSNR_CAP = 150.0  # exact float32 recoveries reach ~140 dB; identical images give inf


def png_bytes(img: np.ndarray) -> bytes:
  """An ``(H, W, 3)`` uint8 image as PNG bytes."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(img, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _fig_bytes(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  return buf.getvalue()


def psnr_figure(summary: dict, rows: list[dict], layers) -> bytes:
  """PSNR per split point: every image a dot, the median a bar, min-max a line; one colour per defence setting."""
  fig = runs.figure(max(4.5, 1.2 * len(layers) + 2.5), 3.6)
  ax = fig.add_subplot(1, 1, 1)
  settings = [s["defence"] for s in summary["settings"]]
  width = 0.7 / len(settings)
  for k, setting in enumerate(settings):
    off = (k - (len(settings) - 1) / 2) * width
    for li, layer in enumerate(layers):
      v = [min(float(r["psnr"]), PSNR_CAP) if r["psnr"] is not None else PSNR_CAP
           for r in rows if r["defence"] == setting and r["layer"] == layer]
      if not v:
        continue
      xs = li + off + np.linspace(-width / 4, width / 4, len(v)) if len(v) > 1 else [li + off]
      ax.plot([li + off] * 2, [min(v), max(v)], "-", color=f"C{k}", lw=1)
      ax.plot(xs, v, "o", color=f"C{k}", ms=4, alpha=0.8, label=setting if li == 0 else None)
      ax.plot([li + off - width / 3, li + off + width / 3], [np.median(v)] * 2, "-", color="k", lw=2)
  ax.axhline(EXACT_PSNR, color="grey", ls="--", lw=0.8)
  ax.text(len(layers) - 0.5, EXACT_PSNR, " exact (8-bit)", fontsize=7, va="bottom", ha="right", color="grey")
  ax.set_xticks(range(len(layers)))
  ax.set_xticklabels(layers)
  ax.set_xlim(-0.6, len(layers) - 0.4)
  ax.set_ylabel("PSNR dB (dots: images; bar: median)")
  ax.set_title("how close each reconstruction is to the image, per split point", fontsize=9)
  if len(settings) > 1:
    ax.legend(fontsize=7)
  fig.tight_layout()
  return _fig_bytes(fig)


def grid_figure(originals: np.ndarray, recs: dict, names, layers, setting: str) -> bytes:
  """Originals (first column) against the reconstruction from each split point, one row per image."""
  n, cols = len(names), 1 + len(layers)
  fig = runs.figure(1.5 * cols, 1.55 * n + 0.3)
  for i in range(n):
    for j in range(cols):
      ax = fig.add_subplot(n, cols, i * cols + j + 1)
      ax.imshow(originals[i] if j == 0 else recs[(setting, layers[j - 1])][i], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title("original" if j == 0 else layers[j - 1], fontsize=8)
      if j == 0:
        ax.set_ylabel(str(names[i])[:14], fontsize=7)
  fig.suptitle(f"reconstructions ({setting})", fontsize=9)
  fig.tight_layout()
  return _fig_bytes(fig)


def _b64(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _e(v) -> str:
  return html.escape(str(v))


def _num(v, spec: str) -> str:
  return "n/a" if v is None else format(v, spec)


def _range(d: dict, spec: str) -> str:
  text = f"{_num(d['median'], spec)} <span class=dim>[{_num(d['min'], spec)}, {_num(d['max'], spec)}]</span>"
  if d["n_finite"] < d["n"]:
    text += f" <span class=warn>({d['n'] - d['n_finite']} not finite)</span>"
  return text


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#1b1b1b;
line-height:1.4;padding:0 16px}
h1{font-size:1.5em;margin-bottom:0}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}
th,td{border:1px solid #d6d6d6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.dim{color:#777;font-size:0.9em}.warn{color:#b45309}
.verdict{padding:10px 14px;background:#f6f8fa;border-left:4px solid #555;margin:10px 0}
.v-exact-recovery{color:#b91c1c;font-weight:600}.v-recognisable{color:#c2410c;font-weight:600}
.v-not-recognisable{color:#15803d;font-weight:600}
table.grid td{text-align:center;font-size:0.75em;padding:3px}
table.grid img{display:block;margin:0 auto 2px;min-width:128px;image-rendering:pixelated}
.verdict ul{margin:4px 0;padding-left:20px}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:0.85em}
"""


def _verdict_span(v: str) -> str:
  return f"<span class=v-{v.replace(' ', '-')}>{_e(v)}</span>"


def _verdict_list(setting: dict) -> str:
  """One line per split point: its verdict, counts and medians, and whether the attack reproduced the observation."""
  items = []
  for lay in setting["layers"]:
    c, n = lay["counts"], lay["images"]
    text = (f"<li><b>{_e(lay['layer'])}</b>: {_verdict_span(lay['verdict'])}. {c['exact recovery']} of {n} exact, "
            f"{c['exact recovery'] + c['recognisable']} of {n} recognisable; median PSNR "
            f"{_num(lay['psnr']['median'], '.1f')} dB, median SSIM {_num(lay['ssim']['median'], '.2f')}.")
    missed = n - lay["reproduces_observation"]
    if missed:
      text += (f" <span class=warn>The attack did not reproduce the observation for {missed} of {n} images: a "
               "stronger attack may recover more.</span>")
    items.append(text + "</li>")
  return f"<div class=verdict><b>{_e(setting['label'])}</b><ul>{''.join(items)}</ul></div>"


def _summary_table(setting: dict) -> str:
  head = ("<tr><th>split point</th><th>verdict</th><th>PSNR dB median [min, max]</th>"
          "<th>SSIM median [min, max]</th><th>observation residual median [min, max]</th>"
          "<th>reproduce the observation</th><th>certificate (images)</th><th>seconds (per image)</th>")
  defended = setting["defence"] != "none"
  if defended:
    head += "<th>utility: agrees with undefended prediction</th><th>feature distortion</th>"
  out = [f"<table class=summary data-defence='{_e(setting['defence'])}'>", head + "</tr>"]
  for lay in setting["layers"]:
    n = lay["images"]
    certs = "<br>".join(f"{_e(s)}: {k}" for s, k in sorted(lay["certificates"].items()))
    cells = [f"<td>{_e(lay['layer'])}</td>", f"<td>{_verdict_span(lay['verdict'])}<br><span class=dim>"
             f"{lay['counts']['exact recovery']} exact, {lay['counts']['recognisable']} recognisable, "
             f"{lay['counts']['not recognisable']} not</span></td>",
             f"<td>{_range(lay['psnr'], '.1f')}</td>", f"<td>{_range(lay['ssim'], '.3f')}</td>",
             f"<td>{_range(lay['observation_residual'], '.1e')}</td>",
             f"<td>{lay['reproduces_observation']} of {n}</td>", f"<td>{certs}</td>",
             f"<td>{lay['seconds']:.1f} ({lay['seconds_per_image']:.1f})</td>"]
    if defended:
      cells += [f"<td>{_num(lay['agreement'], '.0%')} of {n}</td>",
                f"<td>{_range(lay['feature_distortion'], '.3f')}</td>"]
    out.append("<tr>" + "".join(cells) + "</tr>")
  out.append("</table><p class=dim>Certificate (peel_jax.certify_network, at each reconstruction): "
             "<b>underdetermined</b>: fewer informative observed values than pixel values, so a continuum of images "
             "reproduces the observation (a prior, not the observation, decides among them); <b>not_injective</b>: "
             "two different exact preimages were found; <b>locally_underdetermined</b>: the Jacobian is singular at "
             "the reconstruction, numerically or because a layer on the way (a max-pool, an earlier block) has fewer "
             "informative values there than the image has pixel values; <b>determined</b>: no evidence against a "
             "unique preimage (evidence, not proof). Statements about a reconstruction hold for the image only "
             "where it reproduces the observation.</p>")
  return "\n".join(out)


def _grid_table(setting: str, originals, recs, names, layers, rows) -> str:
  by = {(r["layer"], r["image_index"]): r for r in rows if r["defence"] == setting}
  out = [f"<table class=grid data-defence='{_e(setting)}'><tr><th>image</th><th>original</th>"
         + "".join(f"<th>{_e(l)}</th>" for l in layers) + "</tr>"]
  for i, name in enumerate(names):
    cells = [f"<td>{_e(name)}</td>", f"<td class=original><img alt='original {_e(name)}' "
             f"src='{_b64(png_bytes(originals[i]))}'></td>"]
    for layer in layers:
      r = by[(layer, i)]
      v = verdict(r["psnr"], r["ssim"])
      flag = "" if r["reproduces_observation"] else "<br><span class=warn>does not reproduce the observation</span>"
      cells.append(f"<td class=cell title='{_e(r['certificate'])}: {_e(r['certificate_detail'])}'>"
                   f"<img alt='{_e(layer)} reconstruction of {_e(name)}' "
                   f"src='{_b64(png_bytes(recs[(setting, layer)][i]))}'>PSNR {_num(r['psnr'], '.1f')} dB, SSIM "
                   f"{_num(r['ssim'], '.2f')}<br>residual {_num(r['observation_residual'], '.1e')}<br>"
                   f"{_verdict_span(v)}{flag}</td>")
    out.append("<tr>" + "".join(cells) + "</tr>")
  return "\n".join(out + ["</table>"])


def _provenance(info: dict) -> str:
  rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info["table"].items())
  return (f"<table class=provenance>{rows}</table><p>Command line:</p><pre>{_e(info['command'])}</pre>"
          f"<p>Configuration (<code>config.json</code>):</p><pre>{_e(json.dumps(info['config'], indent=2))}</pre>")


def page(summary: dict, rows: list[dict], originals, recs, names, layers, psnr_png: bytes, info: dict) -> str:
  """The whole ``index.html``."""
  parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(info['title'])}</title>"
           f"<style>{_CSS}</style></head><body>", f"<h1>{_e(info['title'])}</h1>",
           f"<p class=dim>{_e(info['subtitle'])}</p>"]
  for note in info["notes"]:
    parts.append(f"<p class=warn>{_e(note)}</p>")
  parts.append("<h2>Verdict</h2>")
  for s in summary["settings"]:
    parts.append(_verdict_list(s))
  parts.append("<p>Thresholds, per image: " + "; ".join(f"<b>{_e(k)}</b>: {_e(v)}" for k, v in THRESHOLDS.items())
               + ". A split point's verdict is the strongest leak reached by at least half its images. "
               + _e(summary["note"]) + "</p>")
  parts.append("<h2>Summary per split point</h2>")
  parts.append(f"<p>Attack: {_e(summary['attack'])}.</p>")
  for s in summary["settings"]:
    parts += [f"<h3>{_e(s['label'])}</h3>", _summary_table(s)]
  parts += ["<h2>PSNR per split point</h2>", f"<img alt='PSNR per split point' src='{_b64(psnr_png)}'>"]
  for s in summary["settings"]:
    parts += [f"<h2>Originals and reconstructions: {_e(s['label'])}</h2>",
              _grid_table(s["defence"], originals, recs, names, layers, rows)]
  parts += ["<h2>Configuration and provenance</h2>", _provenance(info), "</body></html>"]
  return "\n".join(parts)
