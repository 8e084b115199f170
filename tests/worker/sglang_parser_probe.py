"""Run inside .venv-sglang-args (SGLang's real parser; see scripts/setup_sglang_parser_venv.sh).

Reads a JSON list of cases ``{"argv": [...], "served_model_name": [...] | null}`` on stdin, runs each
through the plugin's real parse path (``SGLangEngineFactory.parse_args``: the translation table,
then SGLang's ``ServerArgs.add_cli_args`` / ``from_cli_args``) and prints one JSON object:
``{"options": [every SGLang option string], "results": [...]}``, a result being
``{"ok": true, "argv", "warnings", "fields": {ServerArgs field: value}}`` or
``{"ok": false, "exit_code", "stderr"}`` when the parser refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys


def main() -> None:
    import msgspec

    from ichat.engines.sglang import SGLangEngineFactory

    logging.disable(logging.CRITICAL)  # the translation's warnings come back in the result
    factory = SGLangEngineFactory()
    parser, _ = factory.build_parser()
    options = sorted(s for action in parser._actions for s in action.option_strings)
    results = []
    for case in json.load(sys.stdin):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                spec = factory.parse_args(case["argv"], served_model_name=case.get("served_model_name"))
        except SystemExit as exc:
            results.append({"ok": False, "exit_code": exc.code, "stderr": stderr.getvalue()})
            continue
        args = spec.engine_args
        results.append(
            {
                "ok": True,
                "argv": list(args.argv),
                "warnings": list(args.warnings),
                "served_model_names": list(spec.served_model_names),
                "fields": msgspec.structs.asdict(args.server_args),
            }
        )
    json.dump({"options": options, "results": results}, sys.stdout, default=repr)


if __name__ == "__main__":
    main()
