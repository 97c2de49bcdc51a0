"""The pipeline `loraship ship` and `loraship demo` run: merge, export, verify, repo, then a target.

It strings the library's layers together, so it sits above all of them: each step calls the same
library function as its command, imported inside the step (so this package stays light and no layer
depends on another through it), and only the CLI imports it.

* ``runner``: the resumable step runner (a state file of input and output fingerprints; a re-run skips
  what is unchanged);
* ``build``: merge -> export -> verify -> repo, the steps both commands share;
* ``multi``: several adapters on one base (`ship --adapter NAME=DIR ...`): export with LoRA slots ->
  convert and merge each -> verify each through the multi-adapter engine -> repo with the adapters;
* ``local``: target ``local``, served in the foreground like `loraship serve`, with a first request;
* ``azure``: target ``azure`` (:class:`~loraship.pipeline.azure.AzureTarget`, also what `loraship azure` acts on);
* ``ship`` and ``demo``: the two commands (``demo_multi``: `demo --multi`).

Import from the modules (``from loraship.pipeline.ship import ship``); this package re-exports nothing.
"""
