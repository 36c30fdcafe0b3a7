"""Drawing images with a FLUX pipeline: the one seed rule (`seeds`), the SDEdit cascade's plan (`plan`: stage sizes,
sigma schedules, start sigmas) and its runner (`runner`). Core code shared by the gen and eval jobs, the parallel
runner and the tiny checks; no CLI, no job options.
"""
