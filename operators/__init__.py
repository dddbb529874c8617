"""ringpilot Kubernetes operator: StagedTraining objects run as one KubeRay RayJob per stage."""
