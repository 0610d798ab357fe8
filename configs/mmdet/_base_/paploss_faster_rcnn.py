# The parts that paploss's Faster R-CNN configs share: a Faster R-CNN (FPN) whose two
# stages are trained with the Parameterized AP Loss (paploss SPEC §1, §3), each with its
# own loss spec, as the paper's Faster R-CNN:
#
#   * rpn_head: PAPLossRPNHead, the objectness of every anchor ranked (PseudoSampler:
#     no 256-anchor sampling), box quality (GIoU + 1) / 2 of the decoded proposal;
#   * roi_head.bbox_head: PAPLossBBoxHead, every proposal x class ranked (PseudoSampler:
#     no 512 / 25 % sampling), quality of the box of the proposal's class; at inference
#     its scores are sigmoid(logit) (the loss ranks them), not a softmax.
#
# Each head's `spec` is a loss-spec JSON path, an MLflow models:/ URI, inline control
# points, or a spec-set file (format paploss-specs/1, what a Faster R-CNN search writes:
# heads "rpn" and "roi"), from which each head takes its own:
#
#     --cfg-options model.rpn_head.spec=runs/s/loss_specs.json model.roi_head.bbox_head.spec=runs/s/loss_specs.json
#
# Not a config to train on its own: backbone, FPN sizes, anchors, classes, specs, data
# and schedule come from the config that inherits it (`_base_ = ['./_base_/paploss_faster_rcnn.py']`).
custom_imports = dict(imports=['paploss.integrations.mmdet'], allow_failed_imports=False)
default_scope = 'mmdet'

model = dict(
    type='FasterRCNN',
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
    rpn_head=dict(
        type='PAPLossRPNHead',
        anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True),
        top_k=100000,
        quality='giou'),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0)),
        bbox_head=dict(
            type='PAPLossBBoxHead',
            roi_feat_size=7,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            top_k=100000,
            quality='giou')),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.7,
                neg_iou_thr=0.3,
                min_pos_iou=0.3,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(type='PseudoSampler'),
            allowed_border=-1,
            pos_weight=-1,
            debug=False),
        rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.5,
                match_low_quality=False,
                ignore_iof_thr=-1),
            sampler=dict(type='PseudoSampler'),
            pos_weight=-1,
            debug=False)),
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)))

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
