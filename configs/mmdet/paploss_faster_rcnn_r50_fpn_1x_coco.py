# Faster R-CNN R-50 FPN, 1x schedule on COCO, both stages trained with the Parameterized AP Loss.
#
# The same model, data pipeline and schedule as MMDetection 3.3's
# configs/faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py, stated here (MMDetection's own
# `mmdet::` bases need pkg_resources, which current setuptools no longer ships); the
# heads, assigners, samplers, test settings and runtime come from the local base
# ./_base_/paploss_faster_rcnn.py. What changes from MMDetection's: the RPN head
# (PAPLossRPNHead) ranks every anchor's objectness and the box head (PAPLossBBoxHead)
# every proposal x class with pap_loss (paploss SPEC §1; PseudoSampler for both, no
# 256 / 512 sampling), each with its own loss spec and gradient scale (SPEC §3: the
# 82 numbers of a Faster R-CNN search).
#
#     python tools/train.py configs/mmdet/paploss_faster_rcnn_r50_fpn_1x_coco.py \
#         --cfg-options model.rpn_head.spec=runs/my-search/loss_specs.json \
#                       model.roi_head.bbox_head.spec=runs/my-search/loss_specs.json
#
# The specs below are the search's starting point (the identity function in all five
# places, gradient scale 1) for both heads: replace them with your search's result
# (a spec-set file, each head taking its own; a loss-spec JSON; an MLflow model URI;
# or inline points).
_base_ = ['./_base_/paploss_faster_rcnn.py']

identity = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0]

# The model: the base's Faster R-CNN at R-50 FPN sizes.
model = dict(
    backbone=dict(
        depth=50,
        frozen_stages=1,
        norm_eval=True,
        # No download at run time (init_cfg=None, from the base). Where the
        # internet (or a local copy) is available, restore ImageNet weights with
        #   --cfg-options model.backbone.init_cfg.type=Pretrained \
        #                 model.backbone.init_cfg.checkpoint=torchvision://resnet50
    ),
    neck=dict(
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        num_outs=5),
    rpn_head=dict(
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(strides=[4, 8, 16, 32, 64]),
        spec=dict(points=[identity] * 5, grad_scale=1.0)),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=256, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            in_channels=256,
            fc_out_channels=1024,
            num_classes=80,
            spec=dict(points=[identity] * 5, grad_scale=1.0))))

# COCO 2017 (MMDetection's coco_detection.py)
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val2017.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator

# 1x schedule (MMDetection's schedule_1x.py: lr 0.02 for 16 images per batch);
# val_cfg and test_cfg come from the base
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001))
auto_scale_lr = dict(enable=False, base_batch_size=16)

# runtime (MMDetection's default_runtime.py; the hooks and settings both paploss
# configs use come from the base)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', interval=1),
    visualization=dict(type='DetVisualizationHook'))
env_cfg = dict(dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)
