import type { Routes } from '../http.js';

export const distillationRoutes: Routes = {};
