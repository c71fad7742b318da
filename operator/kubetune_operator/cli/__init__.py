"""`kubetune`: the user CLI, one module per command family.

    main      the parser and the dispatch (`kubetune = kubetune_operator.cli:main`)
    validate  `kubetune validate FILE...`, no cluster and no trainer runtime
    cluster   `kubetune get|status|logs` through the current kubeconfig
    run       `kubetune run FILE`: the job on this machine (imports the trainer and torch)
    serve     `kubetune serve MODEL`: the inference server (imports the server and torch)

Only `run` and `serve` load the trainer runtime; an import-linter contract keeps it that way
(`main` reaches them only through the two dispatch imports the contract names).
"""

from kubetune_operator.cli.main import main

__all__ = ["main"]
