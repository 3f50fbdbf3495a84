"""Losses: distances, the row-wise triplet reference, and the training objectives built on them."""

from crl.losses.distances import DISTANCES, pairwise_distance
from crl.losses.triplet import TripletOutput, triplet_loss_reference

__all__ = ["DISTANCES", "TripletOutput", "pairwise_distance", "triplet_loss_reference"]
