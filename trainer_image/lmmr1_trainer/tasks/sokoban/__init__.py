"""Sokoban as an LMM-R1 agent task (the reference's `train_sokoban.sh`).

`level` (the board and its text form, which is also the dataset's label), `game` (one move
and its environment reward, gym-sokoban's rules), `solver` (breadth-first search: optimal
solutions, proof of solvability), `generate` (solvable levels by reverse play), `render`
(PNG frames), `dataset` (rows in the project's format) and `__main__` (the CLI). The reward
that replays a model's answer is `lmmr1_trainer.verifier.sokoban`.
"""
