"""Configs of the RL room: online fine-tuning with PPO, offline decoding and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lapo_ray import UsageError
from lapo_ray.config.data import check_game
from lapo_ray.config.models import PolicyConfig, cpu_policy_config
from lapo_ray.config.train import WandbConfig


@dataclass
class PartSchedule:
    """Learning rate of one part of the agent: ``scale`` x ``PPOConfig.lr``, zero before ``start``
    environment steps, then decaying linearly to zero at the end of the run (the official LAPO
    stage 3 trains the new heads before the pretrained layers). ``scale`` 0 freezes the part."""

    scale: float = field(default=1.0, metadata={"help": "peak lr of the part as a multiple of --ppo.lr; 0: frozen"})
    start: int = field(default=0, metadata={"help": "env steps before the part starts training (lr 0 until then)"})
    ramp: int = field(default=0, metadata={"help": "env steps over which the lr rises from 0 after start"})

    def schedule(self, lr: float, total_steps: int) -> float | list[list[float]]:
        """RLlib's piecewise-linear ``lr_or_lr_schedule`` over sampled env steps (0.0: frozen)."""
        peak = lr * self.scale
        if peak == 0.0:
            return 0.0
        s, r = self.start, self.ramp
        if s == 0 and r == 0:
            points = [[0, peak]]
        elif r == 0:
            points = [[0, 0.0], [s, 0.0], [s + 1, peak]]
        elif s == 0:
            points = [[0, 0.0], [r, peak]]
        else:
            points = [[0, 0.0], [s, 0.0], [s + r, peak]]
        points.append([max(total_steps, points[-1][0] + 1), 0.0])
        return points


@dataclass
class EnvConfig:
    """Which Procgen levels the agent trains on."""

    game: str = field(default="coinrun", metadata={"help": "Procgen game (one of the 16 in PROCGEN_GAMES)"})
    distribution_mode: Literal["easy", "hard"] = field(default="easy", metadata={"help": "Procgen difficulty"})
    num_levels: int = field(
        default=0, metadata={"help": "size of the training level set; 0: the unbounded level set"})
    start_level: int = field(
        default=0, metadata={"help": "first level seed of the training set (a bounded set must end "
                             "before --eval.held-out-start-level)"})


@dataclass(frozen=True)
class LearnerSettings:
    """What the agent's PPO Learner (``lapo_ray.rl.learner.LapoPPOLearner``) reads beyond RLlib's
    own PPO settings. No defaults here: :meth:`PPOConfig.learner_settings` builds it, so each value
    has one default, in ``PPOConfig``. Plain picklable data, because RLlib copies its config to
    every remote Learner and env runner and into each checkpoint."""

    parts: dict[str, float | list[list[float]]]  # {part: lr schedule}, from PPOConfig.part_schedules
    idm_checkpoint: str | None  # stage-1 checkpoint whose IDM labels the rollouts; None: no decoder SL
    sl_coeff: float
    decoder_rl_grad: bool
    decoder_buffer: int
    decoder_sl_batch: int
    normalize_rewards: bool
    reward_clip: float


@dataclass
class PPOConfig:
    """PPO on RLlib's new API stack, with the per-part schedules of the LAPO agent.

    One training iteration collects ``num_env_runners x envs_per_runner x rollout_length`` steps
    (64 x 64 in the paper) and makes ``num_epochs`` passes over it in ``num_minibatches``. The
    defaults are the official LAPO stage 3's.
    """

    env_steps: int = field(
        default=4_000_000, metadata={"help": "env steps to train for in all; the part schedules decay to 0 there"})
    rollout_length: int = field(default=64, metadata={"help": "steps per env per iteration"})
    num_learners: int = field(default=0, metadata={"help": "0: learn in the driver; N: N learner actors"})
    num_gpus_per_learner: float = field(
        default=0.0, metadata={"help": "GPUs of each Learner (of the driver when --ppo.num-learners 0); "
                               "env runners stay on CPUs"})
    lr: float = field(default=1e-2, metadata={"help": "base lr; each part's schedule scales it"})
    scratch_lr: float = field(default=5e-4, metadata={"help": "lr of every part when training from scratch"})
    gamma: float = field(default=0.999, metadata={"help": "discount factor"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda"})
    clip: float = field(default=0.2, metadata={"help": "PPO's clip range of the probability ratio"})
    vf_clip: float = field(
        default=10.0,
        metadata={"help": "RLlib's clamp on the value loss (the paper clips the value prediction to +-0.2 "
                  "around the old one, which RLlib's PPO loss does not offer)"},
    )
    entropy_coeff: float = field(default=0.0025, metadata={"help": "weight of the entropy bonus"})
    vf_coeff: float = field(default=0.5, metadata={"help": "weight of the value loss"})
    num_epochs: int = field(default=3, metadata={"help": "passes over each iteration's batch"})
    num_minibatches: int = field(
        default=8, metadata={"help": "minibatches per pass; must divide the train batch "
                             "(runners x envs per runner x rollout length)"})
    grad_clip: float = field(default=0.5, metadata={"help": "clip the gradients' global norm to this"})
    normalize_rewards: bool = field(
        default=True, metadata={"help": "scale rewards by the running std of the discounted return"}
    )
    reward_clip: float = field(
        default=10.0, metadata={"help": "with --ppo.normalize-rewards: clip the scaled rewards to +-this"})
    # Parts of the agent (see lapo_ray.rl.module.LapoAgentModule), on the official LAPO stage 3's
    # schedules: the convolutions stay frozen, the value head starts at 25k steps, the RL head at
    # 35k, the trunk at 50k.
    convs: PartSchedule = field(default_factory=lambda: PartSchedule(scale=0.0))
    trunk: PartSchedule = field(default_factory=lambda: PartSchedule(scale=0.1, start=50_000, ramp=150_000))
    rl_head: PartSchedule = field(default_factory=lambda: PartSchedule(scale=0.25, start=35_000, ramp=15_000))
    value_head: PartSchedule = field(default_factory=lambda: PartSchedule(scale=0.25, start=25_000, ramp=25_000))
    decoder: PartSchedule = field(default_factory=lambda: PartSchedule(scale=0.1))
    decoder_sl: bool = field(
        default=True,
        metadata={"help": "train the decoder on the IDM's latents of the rollouts (the paper's RL + SL); "
                  "false: the 'RL, no SL' ablation"},
    )
    sl_coeff: float = field(
        default=1.0, metadata={"help": "weight of the decoder's supervised loss (--ppo.decoder-sl) in the total loss"})
    decoder_rl_grad: bool = field(
        default=False,
        metadata={"help": "let PPO's loss train the decoder too (the joint update); default: the decoder "
                  "learns by supervision only, as in the paper (the 'RL, no SL' ablation always uses RL gradients)"},
    )
    decoder_buffer: int = field(
        default=16_384, metadata={"help": "recent (IDM latent, action taken) pairs the decoder is refit on"}
    )
    decoder_sl_batch: int = field(
        default=4096,
        metadata={"help": "pairs drawn from the buffer for each decoder step (one per PPO minibatch step)"},
    )
    max_env_runner_restarts: int = field(
        default=1000, metadata={"help": "RLlib restarts env runners that fail, up to this many times in all"})

    def part_schedules(self, scratch: bool) -> dict[str, float | list[list[float]]]:
        """Per-part lr schedules; from scratch every part trains from the first step at scratch_lr."""
        parts = {"convs": self.convs, "trunk": self.trunk, "rl_head": self.rl_head,
                 "value_head": self.value_head, "decoder": self.decoder}
        if scratch:
            return {name: PartSchedule().schedule(self.scratch_lr, self.env_steps) for name in parts}
        return {name: part.schedule(self.lr, self.env_steps) for name, part in parts.items()}

    def learner_settings(self, scratch: bool, idm_checkpoint: str | None) -> LearnerSettings:
        """The Learner's part of this config; ``idm_checkpoint`` None trains no decoder by supervision."""
        return LearnerSettings(
            parts=self.part_schedules(scratch), idm_checkpoint=idm_checkpoint, sl_coeff=self.sl_coeff,
            decoder_rl_grad=self.decoder_rl_grad, decoder_buffer=self.decoder_buffer,
            decoder_sl_batch=self.decoder_sl_batch, normalize_rewards=self.normalize_rewards,
            reward_clip=self.reward_clip,
        )


@dataclass
class EvalConfig:
    """Mean return over ``episodes`` episodes on the training levels and on held-out levels."""

    episodes: int = field(
        default=64, metadata={"help": "episodes per level set, rounded up to a multiple of --eval.num-envs"})
    num_envs: int = field(default=32, metadata={"help": "envs stepped together (at most --eval.episodes)"})
    held_out_start_level: int = field(
        default=1_000_000, metadata={"help": "first level seed of the held-out set"}
    )
    greedy: bool = field(default=False, metadata={"help": "argmax actions instead of sampling"})
    seed: int = field(default=12345, metadata={"help": "seed of the evaluation envs and of the action sampling"})


def cpu_eval() -> EvalConfig:
    """Half the episodes, in half the envs: minutes on 2 cores."""
    return EvalConfig(episodes=32, num_envs=16)


def cpu_ppo() -> PPOConfig:
    """The paper's part schedules compressed to a budget of 100k steps, 4 minibatches of the
    smaller train batch."""
    return PPOConfig(env_steps=100_000, num_minibatches=4,
                     trunk=PartSchedule(scale=0.1, start=10_000, ramp=10_000),
                     rl_head=PartSchedule(scale=0.25, start=4_000, ramp=4_000),
                     value_head=PartSchedule(scale=0.25, start=0, ramp=4_000))


def decoder_hidden_field() -> Any:
    """The MLP decoder's widths, one field for the online agent and the offline decoder alike."""
    return field(default=(192, 128, 64),
                 metadata={"help": "hidden layer widths of the MLP decoder (latent action -> action)"})


@dataclass
class DecoderConfig:
    """Offline training of the decoder (latent action -> real action) on k labelled frames."""

    k: int = field(default=256, metadata={"help": "action-labelled frames used for offline decoding (16-8192)"})
    epochs: int = field(default=30, metadata={"help": "passes over the k labelled frames"})
    batch_size: int = field(default=64, metadata={"help": "decoder minibatch size"})
    lr: float = field(default=1e-3, metadata={"help": "decoder learning rate"})
    label_smoothing: float = field(default=0.05, metadata={"help": "label smoothing of the decoder's cross-entropy"})
    held_out: int = field(default=2048, metadata={"help": "labelled validation triplets to report accuracy on"})
    select: Literal["random", "coverage"] = field(default="random", metadata={
        "help": "which k frames get labels: random (the first k of a seeded shuffle) or coverage (k spread over "
                "the IDM's latent space: k-center greedy on a --decoder.pool candidate pool)"})
    pool: int = field(default=8192, metadata={
        "help": "labelled train triplets coverage picks its k from (at least k are drawn); random ignores it"})


@dataclass
class FinetuneConfig:
    """Online decoding: PPO from the latent policy (or from scratch) on many rollout workers. The
    defaults are the `cpu` preset, minutes on 2 cores: the cpu-preset policy, 2 runners x 16 envs
    x 64 steps per iteration and the paper's part schedules compressed to 100k steps."""

    out: str = field(default="artifacts/finetune", metadata={"help": "artifact folder (path or URI)"})
    pretrain: str = field(default="artifacts/pretrain", metadata={"help": "pretrain artifact folder"})
    scratch: bool = field(default=False, metadata={"help": "PPO from scratch (the baseline); ignores --pretrain"})
    num_env_runners: int = field(default=2, metadata={"help": "rollout actors (0: sample in the driver)"})
    envs_per_runner: int = field(default=16, metadata={"help": "Procgen envs stepped together by each runner"})
    cpus_per_env_runner: float = field(
        default=0.5, metadata={"help": "CPUs Ray reserves per env runner; its torch threads: their whole number, >= 1"})
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=cpu_ppo)
    decoder_hidden: tuple[int, ...] = decoder_hidden_field()
    scratch_policy: PolicyConfig = field(default_factory=cpu_policy_config)
    checkpoint_every: int = field(default=5, metadata={"help": "iterations between checkpoints"})
    seed: int = field(default=0, metadata={"help": "RLlib's seed (env runners, their envs, the Learner)"})
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def train_batch(self) -> int:
        return max(1, self.num_env_runners) * self.envs_per_runner * self.ppo.rollout_length

    def validate(self) -> None:
        if self.num_env_runners < 0 or self.envs_per_runner <= 0 or self.ppo.rollout_length <= 0:
            raise UsageError("--num-env-runners must be >= 0; --envs-per-runner and --ppo.rollout-length positive")
        if self.train_batch % self.ppo.num_minibatches:
            raise UsageError(f"train batch {self.train_batch} (runners x envs x rollout length) is not "
                             f"divisible by --ppo.num-minibatches {self.ppo.num_minibatches}")
        if self.ppo.env_steps <= 0:
            raise UsageError("--ppo.env-steps must be positive")
        check_game(self.env.game, "--env.game")


@dataclass
class DecodeConfig:
    """Offline decoding: the decoder learns from k action-labelled frames, then plays."""

    out: str = field(default="artifacts/decode", metadata={"help": "artifact folder (path or URI)"})
    pretrain: str = field(default="artifacts/pretrain", metadata={"help": "pretrain artifact folder"})
    corpus: str = field(default="", metadata={"help": "labelled corpus; empty: the one the pretrain job used"})
    decoder_hidden: tuple[int, ...] = decoder_hidden_field()
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    eval: EvalConfig = field(default_factory=cpu_eval)
    seed: int = field(
        default=0, metadata={"help": "seed of the decoder's initial weights, of the labelled frames drawn and of "
                             "the batch order"})

    def validate(self) -> None:
        if not 1 <= self.decoder.k <= 1_000_000:
            raise UsageError(f"--decoder.k must be a positive number of labelled frames, got {self.decoder.k}")
        if not 1 <= self.decoder.pool <= 1_000_000:
            raise UsageError(f"--decoder.pool must be a positive number of candidate frames, got {self.decoder.pool}")
        check_game(self.env.game, "--env.game")


@dataclass
class EvaluateConfig:
    """Mean raw and normalised return of a fine-tuned or decoded agent."""

    agent: str = field(default="artifacts/finetune", metadata={"help": "a finetune or decode artifact folder"})
    out: str = field(default="", metadata={"help": "where evaluation.json goes; empty: inside --agent"})
    eval: EvalConfig = field(default_factory=cpu_eval)


def paper_finetune() -> FinetuneConfig:
    """The official LAPO stage 3: 64 envs x 64 steps, 8 minibatches, 3 epochs, gamma 0.999,
    lambda 0.95, clip 0.2, entropy 0.0025, 4M steps, lr 1e-2 scaled per part (``PPOConfig``'s own
    defaults), the paper-size policy from scratch."""
    return FinetuneConfig(envs_per_runner=32, cpus_per_env_runner=1.0, ppo=PPOConfig(), scratch_policy=PolicyConfig(),
                          checkpoint_every=10)


def cpu_finetune() -> FinetuneConfig:
    """The class defaults: minutes on 2 cores."""
    return FinetuneConfig()


def paper_decode() -> DecodeConfig:
    return DecodeConfig(eval=EvalConfig())


def paper_evaluate() -> EvaluateConfig:
    return EvaluateConfig(eval=EvalConfig())


# The class defaults are the cpu presets.
FINETUNE_PRESETS = {"paper": paper_finetune, "cpu": cpu_finetune}
DECODE_PRESETS = {"paper": paper_decode, "cpu": DecodeConfig}
EVALUATE_PRESETS = {"paper": paper_evaluate, "cpu": EvaluateConfig}
