"""The search pipeline's steps as plain functions on URIs and small JSON, one module per stage.

Each step is one pipeline task (``components/`` wraps each in a KFP component; the
in-process runner of :mod:`paploss.flow` calls them directly). They share three rules:

- **Inputs and outputs are small**: strings (URIs, JSON), numbers, lists and dicts.
  Large things (datasets, checkpoints, controller states) live at URIs under the
  work folder ``work`` (a local path or ``s3://``), written atomically through
  :mod:`paploss.storage`; :mod:`~paploss.steps.work` names them.
- **Pure and idempotent**: the outputs depend only on the inputs, and a step
  called again with the same inputs finds its finished output and returns it
  without doing the work twice. With KFP's cache this makes a re-run of a stopped
  search replay its finished rounds and go on. All randomness of sampling is the
  controller's.
- **Failures are results**: a proxy trial catches its own exceptions (after
  ``attempts`` tries) and reports ``failed`` so that its round goes on; the
  controller update counts failed and diverged trials as ``min_reward`` (SPEC §3)
  and stops the search, saying so, beyond ``max_failed_trials``.

Stages: :mod:`~paploss.steps.data` → :mod:`~paploss.steps.warm_start` →
:mod:`~paploss.steps.update` (init, then one PPO update per round) with
:mod:`~paploss.steps.trials` → :mod:`~paploss.steps.selection` (optional) →
:mod:`~paploss.steps.lr_sweep` → :mod:`~paploss.steps.finals` → :mod:`~paploss.steps.report`; their options are
checked by :mod:`~paploss.steps.options` before any of them runs.
"""

from paploss.steps.data import prepare_data
from paploss.steps.errors import SearchExists, SearchFailed, StepError
from paploss.steps.finals import BASELINES, SEARCHED, final_train
from paploss.steps.lr_sweep import START, loss_options, lr_trial, lr_pick, start_spec, sweep_items, sweep_lrs
from paploss.steps.options import (MAX_REWARD_SEEDS, MAX_SEARCH_SPLITS, REWARD_SEED_STRIDE, SELECT_RANKS, TRIAL_SEEDS,
                                   check_dataset, check_detectors, check_reward_seeds, check_search_splits,
                                   check_search_val_fraction, check_select_rank, check_selection,
                                   check_train_options, check_work, pretrain_options, reward_seeds_of,
                                   train_options, validate_search_params)
from paploss.steps.context import run_context, tracking_of, training_options
from paploss.steps.report import report, report_outputs
from paploss.steps.selection import select_loss, selection_trials
from paploss.steps.state import load_controller, searched_spec
from paploss.steps.trials import (proxy_config, proxy_trial, reward_noise, round_noise, stored_trial,
                                  trial_results)
from paploss.steps.update import controller_update, init_search
from paploss.steps.warm_start import pretrain
from paploss.steps.work import (SELECTED_STATE, At, _trial_uri, cache_key, content_key, plain, search_dir,
                                search_split_files, state_uri, tracking_config)

__all__ = [
    "StepError", "SearchExists", "SearchFailed", "BASELINES", "SEARCHED", "SELECTED_STATE", "SELECT_RANKS",
    "TRIAL_SEEDS", "REWARD_SEED_STRIDE", "MAX_REWARD_SEEDS", "MAX_SEARCH_SPLITS",
    "prepare_data", "pretrain", "init_search", "proxy_trial", "proxy_config", "controller_update",
    "selection_trials", "select_loss", "final_train", "START", "start_spec", "loss_options", "sweep_lrs",
    "sweep_items", "lr_trial", "lr_pick", "report", "report_outputs", "run_context", "training_options", "tracking_of",
    "load_controller", "searched_spec", "stored_trial", "trial_results",
    "reward_noise", "round_noise",
    "check_dataset", "check_work", "check_detectors", "check_train_options", "check_reward_seeds",
    "check_search_splits", "check_search_val_fraction", "check_select_rank", "check_selection",
    "validate_search_params", "train_options", "pretrain_options", "reward_seeds_of",
    "At", "cache_key", "content_key", "plain", "search_dir", "search_split_files", "state_uri",
    "tracking_config", "_trial_uri",
]
