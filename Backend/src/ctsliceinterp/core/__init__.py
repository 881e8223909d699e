"""The core, free of torch: Volume/Geometry, target grids, the acquisition model, classical
interpolation, progress and errors. Import the modules directly (``ctsliceinterp.core.volume``)."""
