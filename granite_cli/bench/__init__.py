"""`granite bench`: sweep spec, runner, rows and storage, scaling fits, reports. Nothing here prints."""
