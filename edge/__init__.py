"""Device runtime: data, hashing, local training and the FedCache client."""
