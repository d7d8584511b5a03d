"""medcli: grade glioma MRI (LGG vs HGG) with MedicalNet-pretrained 3D ResNets.

Importing the package is cheap (no torch); the engine modules import torch themselves.
"""

__version__ = "0.1.0"
