"""The training setups shipped with the package, one Python file per setup, found by name (`cvt train --config
cvt_13_224`) from any directory: each opens with the command that runs it and the result to expect, sets
`PAPER_RESULT` (the figure `cvt configs` lists) and defines `get_config()` returning a `cvt.train.TrainConfig`.
"""
