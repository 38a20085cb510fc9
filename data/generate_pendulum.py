"""Simulate a damped pendulum and write the example dataset (deterministic by seed).

    python data/generate_pendulum.py [--out data/pendulum] [--seed 0]

The state is (angle, angular velocity); each trajectory starts from a random
state and is integrated with fourth-order Runge-Kutta. Writes
`<out>/train/trajectories.npy` and `<out>/test/trajectories.npy`, float32 arrays
of shape (trajectories, steps + 1, 2), and `<out>/params.json`.
"""

import argparse
import json
from pathlib import Path

import numpy as np

GRAVITY_OVER_LENGTH = 9.81  # g / L, 1/s^2
DAMPING = 0.3  # 1/s
DT = 0.05  # seconds between recorded states
SUBSTEPS = 10  # integration steps per recorded step


def derivative(state: np.ndarray) -> np.ndarray:
    angle, velocity = state[..., 0], state[..., 1]
    return np.stack([velocity, -GRAVITY_OVER_LENGTH * np.sin(angle) - DAMPING * velocity], axis=-1)


def simulate(initial_states: np.ndarray, steps: int) -> np.ndarray:
    """Trajectories of shape (len(initial_states), steps + 1, 2)."""
    h = DT / SUBSTEPS
    states = [initial_states]
    state = initial_states
    for _ in range(steps):
        for _ in range(SUBSTEPS):
            k1 = derivative(state)
            k2 = derivative(state + h / 2 * k1)
            k3 = derivative(state + h / 2 * k2)
            k4 = derivative(state + h * k3)
            state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        states.append(state)
    return np.stack(states, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "pendulum"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-trajectories", type=int, default=256)
    parser.add_argument("--test-trajectories", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    for split, count in (("train", args.train_trajectories), ("test", args.test_trajectories)):
        # Angles within ±2 rad and speeds within ±2 rad/s: the pendulum never swings over the top.
        initial = rng.uniform([-2.0, -2.0], [2.0, 2.0], size=(count, 2))
        (out / split).mkdir(parents=True, exist_ok=True)
        np.save(out / split / "trajectories.npy", simulate(initial, args.steps).astype(np.float32))
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    params = {"gravity_over_length": GRAVITY_OVER_LENGTH, "damping": DAMPING, "dt": DT, **settings}
    (out / "params.json").write_text(json.dumps(params, indent=1) + "\n")
    print(f"wrote {out}/train and {out}/test ({args.train_trajectories} + {args.test_trajectories} trajectories)")


if __name__ == "__main__":
    main()
