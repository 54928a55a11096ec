# A GPU node pool for preftune's training and evaluation steps: an EKS managed node group on an EKS-optimised
# NVIDIA AMI. Nodes carry the label preftune.dev/pool=gpu (the pipelines select on it) and the taint
# nvidia.com/gpu=true:NoSchedule (only pods that tolerate it, i.e. GPU steps, land there).

locals {
  pool_label = { "preftune.dev/pool" = "gpu" }

  # Bottlerocket keeps the OS on /dev/xvda and images / pod storage on /dev/xvdb; AL2023 uses one root volume.
  bottlerocket = startswith(var.ami_type, "BOTTLEROCKET")
  volumes = local.bottlerocket ? {
    "/dev/xvda" = 4
    "/dev/xvdb" = var.disk_size_gib
    } : {
    "/dev/xvda" = var.disk_size_gib
  }
}

data "aws_partition" "current" {}

data "aws_iam_policy_document" "node_assume_role" {
  statement {
    sid     = "EKSNodesAssumeRole"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "gpu_nodes" {
  name_prefix        = "${var.node_group_name}-"
  description        = "Node role of the preftune GPU node group"
  assume_role_policy = data.aws_iam_policy_document.node_assume_role.json
}

# The AWS-managed policies every EKS node needs (join the cluster, pull from ECR, run the VPC CNI), plus SSM so
# Bottlerocket's control container (and AL2023's agent) can be reached without SSH.
resource "aws_iam_role_policy_attachment" "gpu_nodes" {
  for_each = toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
    "AmazonSSMManagedInstanceCore",
  ])

  role       = aws_iam_role.gpu_nodes.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/${each.value}"
}

resource "aws_launch_template" "gpu_nodes" {
  name_prefix            = "${var.node_group_name}-"
  description            = "preftune GPU nodes: encrypted gp3 volumes, IMDSv2 only"
  update_default_version = true

  dynamic "block_device_mappings" {
    for_each = local.volumes
    content {
      device_name = block_device_mappings.key
      ebs {
        volume_size           = block_device_mappings.value
        volume_type           = "gp3"
        encrypted             = true
        kms_key_id            = var.kms_key_arn
        delete_on_termination = true
      }
    }
  }

  # IMDSv2 only, one hop: pods cannot borrow the node role; give them IRSA / Pod Identity instead.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = var.node_group_name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(var.tags, { Name = var.node_group_name })
  }
}

resource "aws_eks_node_group" "gpu" {
  cluster_name    = var.cluster_name
  node_group_name = var.node_group_name
  node_role_arn   = aws_iam_role.gpu_nodes.arn
  subnet_ids      = var.subnet_ids
  version         = var.kubernetes_version

  ami_type       = var.ami_type
  capacity_type  = var.capacity_type
  instance_types = var.instance_types

  launch_template {
    id      = aws_launch_template.gpu_nodes.id
    version = aws_launch_template.gpu_nodes.latest_version
  }

  scaling_config {
    min_size     = var.min_size
    desired_size = var.desired_size
    max_size     = var.max_size
  }

  update_config {
    max_unavailable = 1
  }

  labels = merge(var.extra_labels, local.pool_label)

  taint {
    key    = "nvidia.com/gpu"
    value  = "true"
    effect = "NO_SCHEDULE"
  }

  lifecycle {
    # an autoscaler (Cluster Autoscaler, or a human) owns the size after creation
    ignore_changes = [scaling_config[0].desired_size]

    precondition {
      condition     = var.min_size <= var.desired_size && var.desired_size <= var.max_size
      error_message = "Need min_size <= desired_size <= max_size."
    }
  }

  depends_on = [aws_iam_role_policy_attachment.gpu_nodes]
}
