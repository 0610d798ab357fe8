# The parts that paploss's RetinaNet configs share: a RetinaNet whose head is
# PAPLossRetinaHead (one loss, pap_loss over the whole batch, paploss SPEC §1), the
# paper's head settings, MMDetection's RetinaNet assigner and test settings, and the
# runtime settings both configs use.
#
# Not a config to train on its own: the backbone depth, FPN sizes, anchor strides,
# class count, loss spec, data, schedule and the rest come from the config that
# inherits it, e.g.
#
#     _base_ = ['./_base_/paploss_retinanet.py']
#
# A relative `_base_` is resolved by mmengine itself; MMDetection's own bases
# (`_base_ = 'mmdet::...'`) are not used because mmengine finds those through
# pkg_resources, which current setuptools no longer ships.
custom_imports = dict(imports=['paploss.integrations.mmdet'], allow_failed_imports=False)
default_scope = 'mmdet'

model = dict(
    type='RetinaNet',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(
        type='ResNet',
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='BN', requires_grad=True),
        style='pytorch',
        # No download at run time: the backbone starts from scratch.
        init_cfg=None),
    neck=dict(type='FPN'),
    bbox_head=dict(
        type='PAPLossRetinaHead',
        # The paper's settings for this head: 2 anchor scales per octave (instead of
        # MMDetection's 3) and box-delta stds (0.1, 0.1, 0.2, 0.2) (instead of 1).
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=4,
            scales_per_octave=2,
            ratios=[0.5, 1.0, 2.0]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[0.1, 0.1, 0.2, 0.2]),
        top_k=100000,
        quality='giou'),
    train_cfg=dict(
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0,
            ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type='nms', iou_threshold=0.5),
        max_per_img=100))

val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    param_scheduler=dict(type='ParamSchedulerHook'),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
log_level = 'INFO'
load_from = None
resume = False
