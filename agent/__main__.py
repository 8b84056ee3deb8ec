"""``python -m agent --data DIR [--mqtt URL] …`` runs the agent; ``python -m agent install-offline --data DIR FILE``
installs an offline package (agent/offline_cli.py)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["install-offline"]:
        from agent.offline_cli import main as install_offline

        raise SystemExit(install_offline(sys.argv[2:]))
    from agent.daemon import main

    raise SystemExit(main())
